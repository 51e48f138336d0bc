"""Every command that takes --target / --drafter accepts a Hugging Face id from the local HF cache:
parsed as users type it, resolved to the cached snapshot, stopped before any engine or training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.config import ServerConfig
from tests.hf_cache import add_to_hf_cache, fake_model


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict[str, Path]:
    """Snapshots of a target org/target and a drafter org/head in an offline cache the test builds."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {
        "target": add_to_hf_cache(cache, "org/target", fake_model(tmp_path / "src" / "target")),
        "head": add_to_hf_cache(cache, "org/head", fake_model(tmp_path / "src" / "head", architectures=["Eagle3"])),
    }


def serve_config(monkeypatch, argv: list[str]) -> ServerConfig:
    """The config `vllm-lk serve ARGV` would serve, after the defaults are resolved (no engine)."""
    import server.runner

    served = []
    monkeypatch.setattr(server.runner, "serve", lambda config: served.append(server.runner.resolve_defaults(config)) or 0)
    assert main(["serve", *argv]) == 0
    return served[0]


def test_serve_takes_ids_and_serves_under_the_target_id(hub, monkeypatch):
    config = serve_config(monkeypatch, ["--target", "org/target", "--drafter", "org/head"])
    assert config.target == hub["target"] and config.drafter == hub["head"]
    assert config.model_name() == "org/target"  # not the snapshot's commit hash
    config = serve_config(monkeypatch, ["--target", "org/target@main", "--drafter", "org/head", "--served-model-name", "mine"])
    assert config.target == hub["target"] and config.model_name() == "mine"


def test_serve_of_an_id_that_is_not_cached_is_one_line(hub, capsys):
    assert main(["serve", "--target", "org/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-lk serve: error: target 'org/absent' is neither a local directory nor in the Hugging Face cache")
    assert "hf download org/absent" in err and len(err.splitlines()) == 1


def test_default_drafter_only_for_the_toy_target_given_by_id(hub, tmp_path, monkeypatch):
    """The toy target published under an id still gets the default drafter; any other id serves
    without speculation (the default drafter's recipe is for the toy target only)."""
    import training.toy.target

    toy = fake_model(tmp_path / "src" / "toy")
    (toy / training.toy.target.METADATA_FILE).write_text("{}")
    toy_snapshot = add_to_hf_cache(tmp_path / "hub", "org/toy", toy)
    fake = type(sys)("training.toy.default_drafter")
    fake.ensure_default_drafter = lambda target_dir: tmp_path / f"drafter-for-{Path(target_dir).parent.parent.name}"
    fake.SERVED_K = 4
    monkeypatch.setitem(sys.modules, "training.toy.default_drafter", fake)
    monkeypatch.setattr(training.toy, "default_drafter", fake, raising=False)
    config = serve_config(monkeypatch, ["--target", "org/toy"])
    assert config.target == toy_snapshot and config.drafter == tmp_path / "drafter-for-models--org--toy"
    assert config.num_speculative_tokens == 4 and config.model_name() == "org/toy"
    assert serve_config(monkeypatch, ["--target", "org/target"]).drafter is None


def test_train_takes_an_id(hub, tmp_path, monkeypatch):
    import training.trainer

    calls = []
    monkeypatch.setattr(training.trainer, "train", lambda config, target, data, out, **kw: calls.append(target) or {})
    data = tmp_path / "train.jsonl"
    data.write_text("")
    assert main(["train", "--target", "org/target", "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    assert calls == [hub["target"]]


def test_generate_eval_and_bench_take_ids(hub, tmp_path, monkeypatch):
    from training import evaluate
    from training.bench.speed import SpeedConfig
    from training.config import resolve_config
    from training.generate import GenerateConfig, resolve_target

    args = build_parser("generate").parse_args(["generate", "--target", "org/target", "--out", str(tmp_path / "o.jsonl")])
    assert resolve_target(resolve_config(GenerateConfig, args).target) == hub["target"].resolve()
    args = build_parser("bench").parse_args(["bench", "speed", "--target", "org/target@main"])  # bench resolves the same way
    assert resolve_target(resolve_config(SpeedConfig, args).target) == hub["target"].resolve()

    class Stop(Exception):
        pass

    def stop(config):  # the first step after resolution: stop before prompts or an engine
        raise Stop(config)

    monkeypatch.setattr(evaluate, "vllm_method", stop)
    args = build_parser("eval").parse_args(["eval", "--target", "org/target", "--drafter", "org/head", "--json", "e.json"])
    with pytest.raises(Stop) as stopped:
        evaluate.evaluate_pair(resolve_config(evaluate.EvalConfig, args))
    config = stopped.value.args[0]
    assert config.target == hub["target"].resolve() and config.drafter == hub["head"].resolve()


def test_a_model_id_with_a_slash_is_addressable(tmp_path):
    """GET /v1/models/{id} for the id a target given as ORG/NAME is served under."""
    import threading

    from fastapi.testclient import TestClient

    from server.app import create_app

    release = threading.Event()

    def no_engine():  # /v1/models answers before the engine is up
        release.wait(30)
        raise RuntimeError("no engine (test)")

    config = ServerConfig(target=tmp_path / "m", served_model_name="org/target", default_drafter=False)
    with TestClient(create_app(config, no_engine)) as client:
        card = client.get("/v1/models/org/target")
        assert card.status_code == 200 and card.json()["id"] == "org/target"
        other = client.get("/v1/models/org/other")
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        release.set()
