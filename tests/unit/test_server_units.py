"""Server pieces that need no engine: speculative-stat arithmetic, the rolling window, config and
engine-argument resolution, error shapes, keys, and an app whose engine never becomes ready."""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.auth import check_key
from server.config import ServerConfig
from server.engine import SpecSetup, engine_kwargs, resolve_spec
from server.errors import _field_path
from server.metrics import ServerMetrics, acceptance_buckets
from server.spec_stats import ChoiceTracker, SpecStats, combine
from server.window import SpecWindow
from vllm_lk import engine_defaults


@dataclass
class Record:  # the fields of vLLM's RequestSpecDecodeMetrics that the server reads
    per_step_drafted: list = field(default_factory=list)
    per_step_accepted: list = field(default_factory=list)


def test_spec_stats_count_positions_like_vllm():
    stats = SpecStats(3)
    stats.add_steps([3, 3, 2, 3], [0, 2, 2, 3])
    # position i drafted when a step drafted > i tokens, accepted when > i were accepted
    assert stats.drafted == [4, 4, 3] and stats.accepted == [3, 3, 1]
    assert stats.steps == 4 and stats.accepted_tokens == 7 and stats.drafted_tokens == 11
    assert stats.acceptance_length == pytest.approx(1 + 7 / 4)
    assert stats.acceptance_rates() == [0.75, 0.75, pytest.approx(1 / 3)]
    assert SpecStats(3).acceptance_length is None and SpecStats(2).acceptance_rates() == [None, None]
    usage = stats.to_usage()
    assert usage["verification_steps"] == 4 and usage["accepted_per_position"] == [3, 3, 1]
    assert usage["drafts_per_step"] == pytest.approx(11 / 4) and SpecStats(3).to_usage()["drafts_per_step"] is None


def test_choice_tracker_hands_out_only_new_steps():
    tracker = ChoiceTracker(2)
    record = Record([2], [1])
    assert tracker.update(record).steps == 1
    assert tracker.update(record) is None  # nothing new
    record.per_step_drafted += [2, 2]
    record.per_step_accepted += [2, 0]
    delta = tracker.update(record)
    assert delta.steps == 2 and delta.accepted == [1, 1]
    assert tracker.stats.steps == 3 and tracker.stats.accepted == [2, 1]
    assert tracker.update(None) is None
    total = combine([tracker.stats, tracker.stats], 2)
    assert total.steps == 6 and total.accepted == [4, 2]


def test_window_buckets_expire_and_sum():
    now = [1000.0]
    window = SpecWindow(2, bucket_s=5, horizon_s=20, clock=lambda: now[0])
    step = SpecStats(2)
    step.add_steps([2], [1])
    window.add(2, step)
    now[0] += 6
    window.add(0, step)
    window.add_finished(1.5)
    stats, tokens, _ = window.totals(60)
    assert stats.steps == 2 and tokens == 2
    assert window.totals(1)[0].steps == 1  # only the current bucket (1005..1010)
    series = window.series()
    assert [p["steps"] for p in series["points"]] == [1, 1]
    assert series["points"][1]["request_acceptance_length_mean"] == 1.5
    json.dumps(series)
    now[0] += 100  # beyond the horizon: everything expires
    assert window.series()["points"] == [] and window.totals(60)[0].steps == 0


def test_acceptance_buckets_span_one_to_k_plus_one():
    assert acceptance_buckets(3)[0] == 1.0 and acceptance_buckets(3)[-1] == 4.0
    assert acceptance_buckets(0) == (1.0, 1.25, 1.5, 1.75, 2.0)


def test_alerted_statuses_exist_at_zero_from_the_start():
    """rate() cannot see a series' first appearance: the first 429 must increment an existing 0."""
    text = ServerMetrics(3, SpecWindow(3), 60.0).render().decode()
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        for status in ("429", "500", "503", "504"):
            assert f'vllm_lk_requests_total{{endpoint="{endpoint}",status="{status}"}} 0.0' in text


def test_engine_drafting_record_renders_as_prometheus_series():
    """lk_speculation_stats -> counters, a cumulative drafts-per-step histogram, and (adaptive
    only) the estimated speedup and cost constants; nothing without a record."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServerMetrics(3, SpecWindow(3), 60.0)
    assert "vllm_lk_spec_engine_steps" not in metrics.render().decode()
    stats = {"mode": "adaptive", "max_k": 3, "k": None, "steps": 10, "steps_without_drafts": 2,
             "request_steps_by_drafts": [3, 1, 4, 12], "estimated_speedup": 1.25,
             "cost": {"1:greedy": {"step": 0.004, "per_request": 0.0, "per_draft_pass": 0.0008, "per_drafted_token": 0.0002}}}
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(stats).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("vllm_lk_spec_engine_steps_total", ())] == 10
    assert samples[("vllm_lk_spec_steps_without_drafts_total", ())] == 2
    buckets = [samples[("vllm_lk_spec_drafts_per_step_bucket", (("le", le),))] for le in ("0.0", "1.0", "2.0", "3.0", "+Inf")]
    assert buckets == [3, 4, 8, 20, 20]
    assert samples[("vllm_lk_spec_drafts_per_step_sum", ())] == 1 + 8 + 36
    assert samples[("vllm_lk_spec_estimated_speedup", ())] == 1.25
    assert samples[("vllm_lk_spec_cost_seconds", (("batch_bucket", "1"), ("sampling", "greedy"), ("term", "per_draft_pass")))] == 0.0008
    fixed = dict(stats, mode="fixed", k=3, estimated_speedup=None, cost=None)
    text = metrics.render(fixed).decode()
    assert "vllm_lk_spec_engine_steps_total 10.0" in text and "vllm_lk_spec_estimated_speedup" not in text


def test_config_keys(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\nignored\n")
    assert ServerConfig(target=tmp_path, api_key_file=key_file).resolved_api_key() == "s3cret"
    assert ServerConfig(target=tmp_path, api_key="k").resolved_api_key() == "k"
    with pytest.raises(ValueError):
        ServerConfig(target=tmp_path, api_key="k", api_key_file=key_file)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        ServerConfig(target=tmp_path, api_key_file=tmp_path / "empty").resolved_api_key()
    with pytest.raises(ValueError):
        ServerConfig(target=tmp_path, engine_args={"speculative_config": {}})
    with pytest.raises(ValueError):
        ServerConfig(target=tmp_path, max_queue=0)
    assert ServerConfig(target=tmp_path / "my-model").model_name() == "my-model"
    assert ServerConfig(target=tmp_path, served_model_name="x").model_name() == "x"


def test_constant_time_key_check():
    assert check_key(None, None) and check_key("abc", "abc")
    assert not check_key("abc", None) and not check_key("abc", "abd") and not check_key("abc", "abcd")
    assert check_key("ключ", "ключ")  # non-ASCII keys compare as UTF-8 bytes


def _drafter(tmp_path: Path, metadata: dict | None) -> Path:
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    (drafter / "config.json").write_text("{}")
    if metadata is not None:
        (drafter / "lk_metadata.json").write_text(json.dumps({"format": "vllm-lk-drafter/1", **metadata}))
    return drafter


def test_spec_setup_from_lk_metadata_and_overrides(tmp_path):
    drafter = _drafter(tmp_path, {"vllm_method": "eagle3", "num_speculative_tokens": 4, "loss": "lk-hybrid"})
    spec = resolve_spec(ServerConfig(target=tmp_path, drafter=drafter))
    assert (spec.method, spec.num_speculative_tokens, spec.loss) == ("eagle3", 4, "lk-hybrid")
    spec = resolve_spec(ServerConfig(target=tmp_path, drafter=drafter, method="draft_model", num_speculative_tokens=2))
    assert (spec.method, spec.num_speculative_tokens) == ("draft_model", 2)
    assert resolve_spec(ServerConfig(target=tmp_path)) == SpecSetup()
    with pytest.raises(FileNotFoundError):
        resolve_spec(ServerConfig(target=tmp_path, drafter=tmp_path / "missing"))
    # a training run directory (what `vllm-lk train --out` names) serves the drafter it exported
    assert resolve_spec(ServerConfig(target=tmp_path, drafter=drafter.parent)).drafter == str(drafter.resolve())


def test_engine_kwargs_layering(tmp_path, monkeypatch):
    monkeypatch.setattr("vllm_lk.engine_defaults.on_gpu", lambda: False)
    config = ServerConfig(target=tmp_path, served_model_name="m", engine_args={"dtype": "bfloat16", "max_model_len": 256})
    spec = SpecSetup(drafter="/d", method="draft_model", num_speculative_tokens=3)
    kwargs = engine_kwargs(config, spec)
    assert kwargs["dtype"] == "bfloat16" and kwargs["max_model_len"] == 256  # user wins over CPU defaults
    assert kwargs["gpu_memory_utilization"] == engine_defaults.CPU["gpu_memory_utilization"]
    assert kwargs["per_request_spec_decode_metrics"] == "detailed" and kwargs["served_model_name"] == "m"
    assert kwargs["speculative_config"] == {"method": "draft_model", "model": "/d", "num_speculative_tokens": 3}
    plain = engine_kwargs(config, SpecSetup())
    assert "speculative_config" not in plain and "per_request_spec_decode_metrics" not in plain  # vLLM refuses it alone


def test_engine_args_from_vllm_flags():
    from server.engine import engine_args_from_cli

    parsed = engine_args_from_cli(["--", "--max-model-len", "256", "--tensor-parallel-size", "2", "--enforce-eager"])
    assert parsed == {"max_model_len": 256, "tensor_parallel_size": 2, "enforce_eager": True}
    assert engine_args_from_cli([]) == {}


def test_validation_error_paths_drop_union_tags():
    assert _field_path(("body", "stop", "list[constrained-str]", 3)) == ["stop", "3"]
    assert _field_path(("body", "messages", 0, "content", "str")) == ["messages", "0", "content"]
    assert _field_path(("body", "messages", 0, "content", "list[TextPart]", 0, "TextPart", "text")) == [
        "messages", "0", "content", "0", "text"]


def test_resolve_defaults(tmp_path, monkeypatch):
    import training.toy.target
    from server.runner import resolve_defaults

    target = tmp_path / "toy"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / training.toy.target.METADATA_FILE).write_text("{}")
    monkeypatch.setattr(training.toy.target, "build_toy_target", lambda config: {"path": str(target)})
    fake = type(sys)("training.toy.default_drafter")
    fake.ensure_default_drafter = lambda target_dir: tmp_path / f"drafter-for-{Path(target_dir).name}"
    fake.SERVED_K = 3
    monkeypatch.setitem(sys.modules, "training.toy.default_drafter", fake)
    monkeypatch.setattr(training.toy, "default_drafter", fake, raising=False)
    config = resolve_defaults(ServerConfig())
    assert config.target == target and config.served_model_name == training.toy.target.SERVED_NAME
    assert config.drafter == tmp_path / "drafter-for-toy" and config.num_speculative_tokens == 3
    assert resolve_defaults(ServerConfig(num_speculative_tokens=2)).num_speculative_tokens == 2
    assert resolve_defaults(ServerConfig(default_drafter=False)).drafter is None
    served = tmp_path / "Llama-3.1-8B-Instruct"  # not the toy target: no stdlib drafter trained for it
    served.mkdir()
    (served / "config.json").write_text("{}")
    assert resolve_defaults(ServerConfig(target=served)).drafter is None
    monkeypatch.setitem(sys.modules, "training.toy.default_drafter", None)  # module absent: no speculation
    monkeypatch.delattr(training.toy, "default_drafter", raising=False)
    assert resolve_defaults(ServerConfig()).drafter is None
    with pytest.raises(FileNotFoundError):
        resolve_defaults(ServerConfig(target=tmp_path / "nothing"))


def test_app_before_the_engine_is_ready(tmp_path):
    from server.app import create_app

    release = threading.Event()

    def engine_that_fails():
        release.wait(30)
        raise RuntimeError("no engine (test)")

    config = ServerConfig(target=tmp_path / "m", api_key="k", default_drafter=False)
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(config, engine_that_fails)) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert client.post("/v1/completions", json={"model": "m", "prompt": "x"}).status_code == 401
        busy = client.post("/v1/completions", json={"model": "m", "prompt": "x"}, headers=auth)
        assert busy.status_code == 503 and "retry-after" in busy.headers
        bad = client.post("/v1/chat/completions", json={"model": "m", "messages": "nope"}, headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        missing = client.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        metrics = client.get("/metrics").text
        assert "vllm_lk_info{" in metrics and 'vllm_lk_requests_total{endpoint="/ready",status="503"}' in metrics
        assert client.get("/dashboard").status_code == 200
        assert client.get("/dashboard/data").json()["series"]["points"] == []
        document = client.get("/openapi.json").json()
        assert "422" not in json.dumps(document["paths"]) and "HTTPBearer" in json.dumps(document)
        release.set()
        for _ in range(100):
            if client.get("/health").status_code == 503:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").json()["error"]["code"] == "engine_dead"


NODE_DOM = r"""
const nodes = {};
function mk(tag) {
  return {tag, attrs: {}, children: [], style: {}, textContent: "", clientWidth: 800, clientHeight: 240,
          setAttribute(k, v) { this.attrs[k] = v; }, appendChild(c) { this.children.push(c); return c; },
          removeChild(c) { this.children.splice(this.children.indexOf(c), 1); },
          get firstChild() { return this.children[0] || null; }};
}
globalThis.document = {
  getElementById: id => nodes[id] || (nodes[id] = mk(id)),
  createElementNS: (ns, tag) => mk(tag), createElement: tag => mk(tag),
};
globalThis.setInterval = () => 0;
globalThis.fetch = async () => ({ok: true, json: async () => DATA});
"""


def test_dashboard_script_draws_the_served_json(tmp_path):
    """The page's own script, run in node against a stub DOM, draws the JSON /dashboard/data
    serves (built here from a real window) without errors."""
    import re
    import shutil
    import subprocess

    from server.routes.observability import dashboard_page

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    window = SpecWindow(3, bucket_s=5, horizon_s=900)
    step = SpecStats(3)
    step.add_steps([3, 3], [1, 3])
    window.add(6, step)
    stats, tokens, seconds = window.totals(60)
    data = {"info": {"model": "m", "drafter": "/d", "method": "eagle3", "num_speculative_tokens": 3, "loss": "lk-hybrid",
                     "predicted_tau": 2.4, "offline_alpha": [0.7]},
            "window": {"seconds": seconds, "verification_steps": stats.steps, "acceptance_length": stats.acceptance_length,
                       "acceptance_rate_per_position": stats.acceptance_rates(), "tokens_per_second": tokens / seconds},
            "series": window.series()}
    script = re.search(r"<script>(.*)</script>", dashboard_page(), re.S).group(1)
    check = """
setTimeout(() => {
  const svgs = ["len", "pos"].map(id => document.getElementById(id).children.filter(c => c.tag === "path").length);
  console.log(JSON.stringify({paths: svgs, status: document.getElementById("status").textContent,
                              length: document.getElementById("t-len").textContent}));
}, 50);
"""
    program = tmp_path / "dashboard.js"
    program.write_text(f"const DATA = {json.dumps(data)};\n{NODE_DOM}\n{script}\n{check}")
    out = subprocess.run([node, str(program)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"paths": [1, 3], "status": "", "length": "3.000"}


def test_sampling_params_carry_the_vllm_fields():
    """What the engine gets for the vLLM extensions (their end-to-end effect is tested against a
    real server in tests/integration/test_server_api.py)."""
    from types import SimpleNamespace

    from server.errors import APIError
    from server.generation import sampling_params
    from server.schemas import CompletionRequest

    state = SimpleNamespace(default_sampling={"top_k": 5}, vocab_size=512, spec=SimpleNamespace(num_speculative_tokens=3))
    body = CompletionRequest(model="m", prompt="x", stop_token_ids=[7], skip_special_tokens=False,
                             spaces_between_special_tokens=False, include_stop_str_in_output=True, stop=["\n"])
    params = sampling_params(state, body, 8, None)
    assert params.stop_token_ids == [7] and params.skip_special_tokens is False
    assert params.spaces_between_special_tokens is False and params.include_stop_str_in_output is True
    assert params.top_k == 5 and params.temperature == 1.0 and params.stop == ["\n"]
    with pytest.raises(APIError) as refused:
        sampling_params(state, CompletionRequest(model="m", prompt="x", min_p=0.2), 8, None)
    assert refused.value.param == "min_p" and "speculative" in refused.value.message


def test_requests_are_strict():
    from pydantic import ValidationError

    from server.schemas import ChatCompletionRequest, CompletionRequest

    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        CompletionRequest(model="m", prompt="x", max_token=3)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest(**chat, logit_bias={}, store=False, tool_choice="none").unsupported() is None
    assert ChatCompletionRequest(**chat, logit_bias={"1": 2.0}).unsupported()[0] == "logit_bias"
    assert ChatCompletionRequest(**chat, response_format={"type": "json_schema"}).unsupported()[0] == "response_format"
    assert CompletionRequest(model="m", prompt="x", suffix="y").unsupported()[0] == "suffix"
